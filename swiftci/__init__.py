"""swiftci: CI/CD for fine-tuning and shipping LLMs from GitHub Actions."""

__version__ = "0.1.0"
