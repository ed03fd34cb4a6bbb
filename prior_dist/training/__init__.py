"""Training machinery: the curriculum and the task that turns a batch into named losses."""
