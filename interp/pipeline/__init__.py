"""The pipeline: what runs several stages (`demo`, `benchmark`, `stages`, `speed`). Only this package and
`interp.cli` may import every stage."""
