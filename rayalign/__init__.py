"""rayalign: CLAIR preference pairs and APO training on Ray.

Importing the package is cheap: every heavy dependency (vllm, deepspeed, ray.serve)
is imported inside the stage that needs it.
"""

__version__ = "0.1.0"
