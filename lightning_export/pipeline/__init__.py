"""The pipeline: export and verify over one shared preparation (load, build, inputs, references) and one artifact
check; the manifest; inspect. It names no format: what a format needs, it declares in formats/."""
