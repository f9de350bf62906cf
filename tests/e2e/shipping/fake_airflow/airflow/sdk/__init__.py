import logging
from datetime import timedelta

_current_dag = []


class DAG:
    def __init__(self, dag_id, *, schedule=None, start_date=None, max_active_runs=16, catchup=False, tags=None,
                 **kwargs):
        self.dag_id = dag_id
        self.schedule = schedule
        self.start_date = start_date
        self.max_active_runs = max_active_runs
        self.catchup = catchup
        self.tags = tags or []
        self.task_dict = {}

    def __enter__(self):
        _current_dag.append(self)
        return self

    def __exit__(self, *exc):
        _current_dag.pop()

    def get_task(self, task_id):
        return self.task_dict[task_id]


class BaseOperator:
    template_fields = ()

    def __init__(self, *, task_id, retries=0, retry_delay=timedelta(seconds=300), max_active_tis_per_dag=None,
                 **kwargs):
        if kwargs:
            raise TypeError(f"Invalid arguments were passed to {type(self).__name__}: {sorted(kwargs)}")
        self.task_id = task_id
        self.retries = retries
        self.retry_delay = retry_delay
        self.max_active_tis_per_dag = max_active_tis_per_dag
        self.upstream_task_ids = set()
        self.downstream_task_ids = set()
        self.log = logging.getLogger(f"airflow.task.operators.{type(self).__name__}")
        if _current_dag:
            _current_dag[-1].task_dict[task_id] = self

    def __rshift__(self, other):
        self.downstream_task_ids.add(other.task_id)
        other.upstream_task_ids.add(self.task_id)
        return other

    def on_kill(self):
        pass
