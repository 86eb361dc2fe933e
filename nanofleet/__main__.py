from nanofleet.cli import main

main()
