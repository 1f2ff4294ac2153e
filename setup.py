"""Packaging is declared in setup.cfg; this shim keeps `pip install -e .` working with older pip/setuptools."""

from setuptools import setup


setup()
