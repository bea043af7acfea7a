"""TFX integration: `trainer_module.py` is the `module_file` of a TFX Trainer.

Nothing here imports `tfx`; the module runs wherever TFX's Trainer executor runs it
and in plain Python with an object carrying TFX's `FnArgs` fields.
"""
