from lightning_mtl.cli import main

if __name__ == "__main__":
    main()
