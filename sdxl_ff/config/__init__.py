"""The configuration: typed sections, loading, value checks, rules across keys, sources and sampler names as a config
gives them."""
