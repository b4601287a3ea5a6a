from twisted.application.service import ServiceMaker

bwraft = ServiceMaker("bwraft", "bwcore.tap", "A bwraft (BW-Raft) node.", "bwraft")
