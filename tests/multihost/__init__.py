"""Multi-host tests: several "machines" made of Linux network namespaces (see `netns`)."""
