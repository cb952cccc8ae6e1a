"""What a run's state is made of, as the Store holds it: settings, round states, reports, partial sums.

Typed records with their encoding and their checks; the functions (``server/functions``) and the
parameter server (``server/paramserver.py``) read and write the Store only through these and the keys.
"""
