"""The embedded benchmark (`cdcca-edge demo`): procedural scenes, the tiny text and
LLaVA-style models built offline, and the CDCCA loop that runs them end to end."""
