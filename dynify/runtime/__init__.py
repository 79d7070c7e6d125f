"""The runtime: DynamicModel and the modules that decide, per sample, what work to do."""
