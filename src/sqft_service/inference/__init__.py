"""The embedded inference engine: base models loaded once, PEFT adapters switched per request.

Only :mod:`.engine` touches torch, and only inside its worker thread, so importing this package (the
API process does) stays torch-free.
"""
