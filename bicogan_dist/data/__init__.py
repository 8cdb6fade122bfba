"""Data: readers of FER2013 layouts → webdataset shards + manifest → loaders → augmentation."""
