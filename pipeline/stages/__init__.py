"""One thin module per DVC stage and CLI command (convert, pull, train, evaluate, export, predict, push,
lr-find, fetch-encoder): ``main()`` reads its params section once and calls the layers with plain values.
"""
