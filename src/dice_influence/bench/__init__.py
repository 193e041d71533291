"""Benchmarks that write their numbers to JSON, one module each (never timed assertions).

- :mod:`.train`: seconds per training round vs its floor and a per-node loop;
- :mod:`.influence`: DICE-GT / DICE-E per event and all-sample attribution;
- :mod:`.proximal`: overhead of online proximal influence;
- :mod:`.distributed`: real local peers vs the simulator.

The ``dice bench …`` commands are registered by :mod:`.cli`.
"""
