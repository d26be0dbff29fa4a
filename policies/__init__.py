"""The shipped stage-policy presets (``*.yaml``), installed as package data of ``stsc.policies``."""
