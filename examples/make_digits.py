"""Make examples/data/digits-train.npz and digits-test.npz from scikit-learn's
bundled 8×8 handwritten digits (1,797 images, UCI ML optical recognition data).

scikit-learn is not a dependency of popdsl: the two files are committed, and this
script is how they were made.  To remake them:

    python -m venv /tmp/sk && /tmp/sk/bin/pip install scikit-learn numpy
    /tmp/sk/bin/python examples/make_digits.py

Images are float32 in [0, 1] (the 0..16 grey levels divided by 16), shaped
[N, 1, 8, 8] for a convolution; labels are int32.  The examples are shuffled with
a fixed seed and split into 1,437 for training and 360 held out for testing.
"""
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

TEST = 360

digits = load_digits()
order = np.random.default_rng(0).permutation(len(digits.target))
images = (digits.images[order] / 16.0).astype(np.float32)[:, None, :, :]
labels = digits.target[order].astype(np.int32)
out = Path(__file__).resolve().parent / "data"
out.mkdir(exist_ok=True)
np.savez_compressed(out / "digits-train.npz", images=images[TEST:], labels=labels[TEST:])
np.savez_compressed(out / "digits-test.npz", images=images[:TEST], labels=labels[:TEST])
print(f"wrote {len(labels) - TEST} training and {TEST} test digits to {out}")
