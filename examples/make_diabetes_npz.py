"""Write examples/diabetes.npz from scikit-learn's bundled diabetes data (offline).

442 patients, 10 standardised features, target = disease progression after one year,
standardised (mean 0, std 1 over the training split). Seeded 80/20 split: 352 train, 90 test.
Run from the repository root: ``python examples/make_diabetes_npz.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.datasets import load_diabetes


def main(out: str | Path = Path(__file__).with_name("diabetes.npz")) -> Path:
    x, y = load_diabetes(return_X_y=True)
    perm = np.random.default_rng(0).permutation(len(y))
    tr, te = perm[:352], perm[352:]
    mx, sx = x[tr].mean(0), x[tr].std(0)
    my, sy = y[tr].mean(), y[tr].std()
    np.savez(out, x_train=(x[tr] - mx) / sx, y_train=(y[tr] - my) / sy,
             x_test=(x[te] - mx) / sx, y_test=(y[te] - my) / sy)
    return Path(out)


if __name__ == "__main__":
    print(main())
