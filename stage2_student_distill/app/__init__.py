"""The application: the `pipeline` command (its root and every command's registration), the demo, the
web pages (`pipeline serve`) and the config/recipes commands.

It stands on top of the library: it imports common/, data_manifests/ and both stages, and nothing in the
library imports it (tests/test_layers.py holds that). It lives in stage 2's folder because the
repository's top level is fixed and stage 2 is the library's top floor; docs/design-notes.md has the map.
"""
