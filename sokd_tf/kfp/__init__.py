"""The steps of the Kubeflow Pipelines definition (`pipelines/kfp_pipeline.py`).

Each KFP component is a few lines calling one function of `steps`; the components pass
whole run workdirs as Model artifacts.
"""
