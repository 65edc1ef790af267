"""``scalebox db serve``: the embedded PostgreSQL served on TCP (scram-sha-256 over TLS), here or
as a long-lived Slurm job that hands over to its successor before its walltime ends.

::

    tls.py      openssl argv for the generated CA and each host's server certificate
    server.py   the data directory, its configuration, start/stop, the service file
    job.py      the Slurm job: sbatch argv and script, hand-over timing and protocol

Clients find the served database through :mod:`scalebox_hpc.servicefile`.
"""
