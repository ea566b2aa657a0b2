"""The models-from-code file of every raygen MLflow Model (see raygen.tracking.pyfunc).

MLflow copies this file into the model folder and runs it when the model is
loaded: it builds no model and holds no weights; `RaygenPyfunc.load_context`
reads the export folder (safetensors weights and spec) from the model's
artifacts with raygen's own loader.
"""
import mlflow.models

from raygen.tracking.pyfunc import RaygenPyfunc

mlflow.models.set_model(RaygenPyfunc())
