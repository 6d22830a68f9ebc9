"""Where the recorder runs, and how a gateway hands it outcome records.

One decision per served configuration (`placement`): the recorder in the gateway's process
(`host.RecorderHost`), in a child process of the gateway (`process.RecorderProcess`, the default
with one gateway replica), or as its own Serve deployment (`deployment`, for several gateway
replicas). `shipper.OutcomeShipper` queues records off the request path and hands them over.
"""
