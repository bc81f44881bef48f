"""The committed corpus of real JobWorkflow histories (see README.md here) and its tools."""
