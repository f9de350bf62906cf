from airflow.sdk.exceptions import AirflowException


class DockerContainerFailedException(AirflowException):
    def __init__(self, message=None, logs=None):
        super().__init__(message)
        self.logs = logs
