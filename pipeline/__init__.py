"""CoCosNet pipeline: data, training, tracking, evaluation, registry, inference and the command line."""
