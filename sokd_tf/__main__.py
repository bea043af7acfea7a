"""`python -m sokd_tf COMMAND ...` is the `sokd-tf` command (`pipelines.cli`)."""

from pipelines import cli

if __name__ == "__main__":
    cli.main()
