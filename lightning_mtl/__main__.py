"""``python -m lightning_mtl {fit,validate,test,predict} ...`` (the Lightning CLI) and
``python -m lightning_mtl report RUN_DIR ...`` (tables and a chart of finished runs)."""

if __name__ == "__main__":
    from lightning_mtl.cli import main

    main(prog="python -m lightning_mtl")
