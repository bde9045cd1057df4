from swiftci.cli import main

main()
