"""The embed stage: a timm backbone over image shards on Ray workers -> embedding shards."""
