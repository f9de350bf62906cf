class AirflowException(Exception):
    pass


class AirflowFailException(AirflowException):
    """Fail the task without retrying."""
