"""Interoperability with other libraries: Hugging Face checkpoints in and out (:mod:`.hf`)."""
