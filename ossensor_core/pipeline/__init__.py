"""The pipeline and its loading: configuration, plugin loading, start-up, the run loop."""
