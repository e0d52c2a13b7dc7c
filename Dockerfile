# pyexec-connector image. Add the packages your scripts import to localRequirements.txt, then:
#   docker build -t pyexec-connector .
#   docker run -v $PWD/serverConfig:/home/connector/serverConfig pyexec-connector
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 10001 connector

# Users' extra packages first: this layer is rebuilt only when the list changes.
COPY localRequirements.txt /tmp/localRequirements.txt
RUN pip install -r /tmp/localRequirements.txt

COPY pyproject.toml README.md /tmp/build/
COPY src /tmp/build/src
RUN pip install /tmp/build && rm -rf /tmp/build

USER connector
WORKDIR /home/connector
# server.config and logger.ini are mounted here.
VOLUME ["/home/connector/serverConfig"]
ENTRYPOINT ["pyexec-connector"]
