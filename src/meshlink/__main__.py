from meshlink.cli import main

main()
