"""Peer-to-peer runtime: the simulator's round on torch.distributed, one process per peer.

``dice peer CONFIG`` runs one peer (rank from the torch.distributed environment, so torchrun
works); ``dice launch CONFIG --peers N`` runs N local peers on loopback. Each peer holds only its
own partition, gossips with its neighbours by point-to-point messages, measures the proximal
influence of each in-neighbour (positive = harmful) and can drop harmful ones. See
``docs/distributed.md``.
"""

from .launch import LaunchResult, common_checkpoint, launch
from .local import LocalProblem, build_local
from .peer import Peer, PeerState, run_peer
from .reference import Reference, simulate
from .settings import DistributedSettings, distributed_settings
from .transport import PeerFailure

__all__ = [
    "DistributedSettings",
    "LaunchResult",
    "LocalProblem",
    "Peer",
    "PeerFailure",
    "PeerState",
    "Reference",
    "build_local",
    "common_checkpoint",
    "distributed_settings",
    "launch",
    "run_peer",
    "simulate",
]
