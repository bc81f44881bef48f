"""Example pipelines and the user functions they reference (`examples.clicks:is_big`)."""
