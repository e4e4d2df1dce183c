"""lmmscope's core and its pipeline: model access (`model`), the activation cache (`cache`), the shapes
world (`shapes`), shared infrastructure (`infra`); `pipeline` and `cli` run the stages together."""

__version__ = "0.1.0"
