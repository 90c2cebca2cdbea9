"""ikkuna-mlflow: the ``mlflow`` backend, which writes a run's metrics to MLflow."""

from .backend import MlflowBackend, histogram_quantiles

__all__ = ["MlflowBackend", "histogram_quantiles"]

__version__ = "0.1.0"
