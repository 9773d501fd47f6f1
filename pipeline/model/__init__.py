"""The model-side stages: sources and loading, inputs, the vision encoder, the trimmer and its selection policies."""
