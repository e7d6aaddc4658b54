import { rulesSuite } from './rules-suite.js';

rulesSuite('iptables-nft');
