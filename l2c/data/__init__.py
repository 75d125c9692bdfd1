"""l2c.data: webdataset shards and caption records: reading, writing, converting, and the demo data."""
