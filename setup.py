"""Build driver: the Python package plus the native extension from csrc/ (see CMakeLists.txt)."""
from setuptools import setup

setup()
