"""The cache stage: data sources (`data`), the writer (`writer`, `interp cache`), the on-disk format
with the token schema and role predicates (`format`), the reader every later stage uses
(`reader.ActivationReader`) and its speed benchmark (`bench`)."""
