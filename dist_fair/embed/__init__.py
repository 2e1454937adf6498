"""The embed stage: a registered embedder (dlib's face ResNet, any timm backbone) over image
shards on Ray workers -> embedding shards. ``create_embedder`` / ``register_embedder`` in
``registry.py``; ``run_embed`` in ``stage.py``."""
