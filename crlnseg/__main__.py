from crlnseg.cli.app import main

main()
