from airflow.providers.docker.exceptions import DockerContainerFailedException
from airflow.sdk import BaseOperator


class DockerOperator(BaseOperator):
    template_fields = ("image", "command", "environment", "env_file", "container_name", "mounts")

    def __init__(self, *, image, command=None, docker_url=None, environment=None, private_environment=None,
                 mounts=None, auto_remove="never", mount_tmp_dir=True, user=None, env_file=None,
                 container_name=None, **kwargs):
        super().__init__(**kwargs)
        self.image = image
        self.command = command
        self.docker_url = docker_url
        self.environment = environment or {}
        self._private_environment = private_environment or {}
        self.mounts = mounts or []
        self.auto_remove = auto_remove
        self.mount_tmp_dir = mount_tmp_dir
        self.user = user
        self.env_file = env_file
        self.container_name = container_name
        self.container = None
        self.cli = None  # the real one: docker.APIClient from the hook; tests set a client

    def execute(self, context):
        self.container = self.cli.create_container(command=self.command, image=self.image,
                                                   environment={**self.environment, **self._private_environment})
        self.cli.start(self.container["Id"])
        logs = list(self.cli.logs(self.container["Id"]))
        result = self.cli.wait(self.container["Id"])
        if result["StatusCode"] != 0:
            raise DockerContainerFailedException(f"Docker container failed: {result!r}", logs=logs)
        return logs[-1] if logs else None

    def on_kill(self):
        if self.container is not None:
            self.cli.stop(self.container["Id"])
