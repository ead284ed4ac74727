"""The core of the memory layer: the memory package and the database tooling."""
