"""Device profiles: installed as ``edgebll.devices``."""
