"""dolm-merge: join the tables of ``--shard K/N`` runs (a job array) into one."""
