"""A scikit-learn transformer that serves cached features by image path.

It lets users put the cache into their own ``Pipeline`` / ``GridSearchCV``: the samples
``X`` are image paths (as stored in the cache file's ``/index/paths``) and
``transform`` returns their rows of one layer. ``layer`` is an ordinary parameter, so a
grid search can choose the depth too.

Examples
--------
>>> from sklearn.linear_model import LogisticRegression            # doctest: +SKIP
>>> from sklearn.model_selection import GridSearchCV
>>> from sklearn.pipeline import make_pipeline
>>> from tlp import CachedFeatures, FeatureFile, extract
>>> result = extract("photos/", layers=("early", "mid", "late"))
>>> with FeatureFile(result.path) as f:
...     paths, y = f.paths, f.labels
>>> model = make_pipeline(CachedFeatures(result.path), LogisticRegression(max_iter=1000))
>>> search = GridSearchCV(model, {"cachedfeatures__layer": ["early", "mid", "late"]}).fit(paths, y)
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin

from .featurefile import FeatureFile
from .errors import TlpInputError

__all__ = ["CachedFeatures"]


class CachedFeatures(TransformerMixin, BaseEstimator):
    """Image paths -> cached features of one layer.

    Parameters
    ----------
    cache_file : str or path
        A finished cache file (``ExtractResult.path``).
    layer : str
        Layer name in the file (``early``, ``mid``, ``late``, ...).
    dtype : numpy dtype
        Output dtype (float32 by default; the file may store float16).
    """

    def __init__(self, cache_file=None, layer: str = "late", dtype=np.float32):
        self.cache_file = cache_file
        self.layer = layer
        self.dtype = dtype

    def fit(self, X=None, y=None):
        """Load the layer and index its rows by path (X is not needed)."""
        if self.cache_file is None:
            raise TlpInputError("CachedFeatures needs cache_file=<path of a tlp cache file>")
        with FeatureFile(self.cache_file) as features:
            self.features_ = features.load(self.layer, dtype=self.dtype)
            self.row_of_ = {path: row for row, path in enumerate(features.paths)}
        self.n_features_out_ = int(self.features_.shape[1])
        return self

    def transform(self, X) -> np.ndarray:
        """(n_samples,) image paths -> (n_samples, D) features."""
        if not hasattr(self, "features_"):
            self.fit()
        paths = np.asarray(X, dtype=object).reshape(-1)
        try:
            rows = [self.row_of_[str(path)] for path in paths]
        except KeyError as error:
            raise TlpInputError(
                f"image {error.args[0]!r} is not in cache file {self.cache_file}; pass paths as stored in "
                "its /index/paths (relative to the data folder), or extract that image first"
            ) from None
        return self.features_[rows]

    def get_feature_names_out(self, input_features=None):
        return np.asarray([f"{self.layer}_{i}" for i in range(self.n_features_out_)], dtype=object)
